"""Media: bytes into what a model's processor takes, decoded as sentence-transformers decodes the same
file: images and text (decode.py), audio and video (av.py), PDF pages (pdf.py), JPEGs on the GPU
(device_decode.py). Imports nothing of mmembed."""
