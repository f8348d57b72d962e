"""Optional dependencies: import one, or raise ``MissingDependency`` naming the extra to install.

``import pagedkv`` needs numpy only. The modules that need more import it through ``require``,
so a user who installed the core package and then imports ``pagedkv.cache`` is told
``pip install 'pagedkv[kernels]'`` instead of seeing a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency

#: Extra of ``pyproject.toml`` that installs each optional top-level module.
EXTRAS = {"torch": "kernels", "triton": "kernels", "hypothesis": "testing", "matplotlib": "plot",
          "transformers": "examples", "msgspec": "events", "zmq": "events", "cbor2": "events"}


def require(module: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or ``MissingDependency`` if it is not installed.

    Args:
        module: dotted module name, e.g. ``"triton.language"``.
        feature: what needs it, for the message (e.g. ``"pagedkv.cache"``).

    Raises:
        MissingDependency: the top-level package is not installed (an ``ImportError`` raised
            inside an installed package propagates unchanged).
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in (top, module):
            raise
        raise MissingDependency(top, feature, EXTRAS.get(top, "test")) from None
