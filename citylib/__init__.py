"""citylib: what makes a city look like itself?

Train CNNs to recognise cities from street-level images, explain them with Grad-CAM,
and measure which objects each city's network attends to. The notebooks under
``notebooks/`` call into this package; every stage lives in a module named after it.
"""

__version__ = "0.1.0"
