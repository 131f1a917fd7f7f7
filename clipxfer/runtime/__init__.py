"""The torch-free runtime of exported bundles: numpy, pillow and openvino only
(``pip install 'clipxfer[runtime]'``). ``clipxfer-run`` is its command line."""

from .bundle import Bundle, Classified, Inspected

__all__ = ["Bundle", "Classified", "Inspected"]
