"""Edge vision daemon: camera frames to detection, OCR and code reading, results over MQTT."""

__version__ = "0.1.0"
