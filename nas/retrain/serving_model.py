"""MLflow's "model from code" file for the served image classifier: logged with the model and run by MLflow when
it loads it, so nothing is pickled (see :mod:`nas.retrain.serving`)."""

import mlflow

from nas.retrain.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
