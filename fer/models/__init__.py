"""Models: the searchable CNN and VGG16."""
