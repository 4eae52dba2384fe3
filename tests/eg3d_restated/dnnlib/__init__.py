from .util import EasyDict  # noqa: F401  (EG3D exposes it at the package level too)
