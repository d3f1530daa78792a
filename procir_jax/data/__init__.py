"""Input processing for ProCIR: images, dialogues, tokens and batches."""
