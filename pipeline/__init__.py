"""data2vec pretraining on Ray: ingestion, model, training, evaluation."""
