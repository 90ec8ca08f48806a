"""Shared test support: the backends under test, input cases, the float64 reference,
shared assertions and gradients by the backends' autodiff. Test files import from here
(``from support import reference``); nothing imports a test file."""
