"""The Fashion-MNIST model zoo: architectures (``models``) and the builder (``build``)."""
