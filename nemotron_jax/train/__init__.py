"""Training: the one loop (`loop.run`), the step functions, the objective contract
(`objective.py`), the objective families (`objectives/`) and REINFORCE's rollouts.

Experiments of several stages, ExPO and evaluation run above this package, in
`nemotron_jax/experiment.py`.
"""
