"""MLflow tracking: one parent run per study, one nested run per trial, winners as artifacts."""
