"""The examples in public docstrings run."""

import doctest

import pytest

import forgetscope._display
import forgetscope.api
import forgetscope.metrics


@pytest.mark.parametrize("module", [forgetscope._display, forgetscope.api, forgetscope.metrics])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
