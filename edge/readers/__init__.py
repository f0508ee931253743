"""Region readers: OCR for text, zbar for QR codes and barcodes."""
