"""`mixsd train`: SFT, continued pretraining and OPSD on a target file, checkpoints and the learning curve."""
