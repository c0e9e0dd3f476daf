"""Stand-in for timm in the tests of the release's published packing file, which imports timm's model registry for
its factory functions (never for the model itself); the real timm needs torchvision, which the project does not."""
