"""The face path: detection, aligned crops with a counted fallback, FaceNet and dlib embedders."""
