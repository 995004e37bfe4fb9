"""OpenCLIP image towers: creation from a name or config, local weights, partial unfreezing."""
