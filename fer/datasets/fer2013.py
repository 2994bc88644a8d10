"""FER2013: class names (the single CLASSES tuple of the codebase)."""

# The original FER2013 label order: the ids of fer2013.csv and of the papers.
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(CLASSES)
