"""Shared test support: the backends under test, input cases, the float64 reference
and shared assertions. Test files import from here (``from support import reference``);
nothing imports a test file."""
