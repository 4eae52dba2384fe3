"""DreamPortrait's kernels inside other code bases: :mod:`dreamportrait.integrations.eg3d` for EG3D
and its forks."""
