"""DreamPortrait: text-guided 3D-aware portrait generation in a single forward pass.

``import dreamportrait`` is cheap and never compiles anything: the compiled operators are loaded
(or JIT-built) on first use, see :mod:`dreamportrait._extension`.
"""

__version__ = "0.1.0"
