"""The tiny SD3 family: scenes to train on (scenes), the configs, random-weight models and the shipped trained model
(family), and its training recipe (train)."""
