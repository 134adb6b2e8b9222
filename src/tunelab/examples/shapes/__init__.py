"""A vision task generated with Pillow whose answers need the image: the colour or the shape of one figure."""
