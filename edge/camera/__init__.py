"""Camera backends behind one interface; see :mod:`edge.camera.base`."""
