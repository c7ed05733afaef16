"""The retraining sidecar: snapshot served traffic, run OPD on it, gate the candidate, promote it."""
