"""The Beam pipelines (index, train) and what they share.

Importing the package sets Arrow's memory pool before any module of it loads pyarrow: Arrow's C++
library reads ``ARROW_DEFAULT_MEMORY_POOL`` once, when pyarrow loads, and its readers and kernels
allocate from that pool whatever ``pyarrow.set_memory_pool`` says later. The wheels' default
(mimalloc) keeps what Beam's bundle threads freed, so RSS grew with the catalog (issue 9); the C
library's malloc gives it back. A value the user set is kept. files.use_system_memory_pool does the
rest (pyarrow's own default, and the case of a pyarrow loaded before this package).
"""

import os

ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
ARROW_POOL = "system"
#: True when this package chose the pool (the variable was unset), False when the user had set it.
POOL_CHOSEN_HERE = ARROW_POOL_ENV not in os.environ
os.environ.setdefault(ARROW_POOL_ENV, ARROW_POOL)
