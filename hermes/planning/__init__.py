"""Memory planning: the formulas (`memory`, `activations`) and the CPU measurement that checks them
(`measure`). The command line is `python -m hermes.plan`."""
