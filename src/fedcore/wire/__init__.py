"""What researchers and nodes both speak: messages, codec, chunks, signing, request/reply."""
