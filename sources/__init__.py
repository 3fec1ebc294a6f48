"""Training data sources, one module each; `preprocess.load_dataset` composes them into one set."""
