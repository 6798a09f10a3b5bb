"""Exceptions of `models.phantoms`.

PhantomError (ValueError)   bad anatomy / label / override / output request
"""


class PhantomError(ValueError):
    """Invalid phantom request (unknown anatomy, label, override or sequence)."""
