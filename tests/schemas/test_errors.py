from schemas.errors import brief


def test_brief_keeps_the_telling_line():
    tf_like = RuntimeError("Graph execution error:\n\nDetected at node Assert/Assert defined at (most recent call "
                           "last):\n<stack traces unavailable>\nassertion failed: [boom]\n\t [[{{node Assert}}]]")
    assert brief(tf_like) == "RuntimeError: assertion failed: [boom]"
    assert brief(ValueError("first\nsecond")) == "ValueError: first"
    assert brief(KeyError()) == "KeyError: "
    assert len(brief(ValueError("x" * 1000), limit=50)) == 50
