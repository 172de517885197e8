"""The CAM methods, one file each: ``base`` holds what they share, every other module of this
package is a method that registers itself (``base.register``) when it is imported here. A new
method is one more file (copy ``hirescam.py``). ``METHODS`` maps each name to its class, which is
also an attribute of this package (``cams.GradCAM``).
"""
import importlib
import pkgutil

from citylib.explain.cams.base import METHODS, BaseCAM, CamResult, batches, make, masks_for, register

for _module in pkgutil.iter_modules(__path__):       # every method file, in name order
    importlib.import_module(f"{__name__}.{_module.name}")
globals().update({cls.__name__: cls for cls in METHODS.values()})

__all__ = ["METHODS", "BaseCAM", "CamResult", "batches", "make", "masks_for", "register",
           *(cls.__name__ for cls in METHODS.values())]
