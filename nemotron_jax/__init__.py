"""nemotron_jax: HelpSteer2-Preference reward models and REINFORCE alignment in JAX.

Importing the package is cheap; submodules import their heavy dependencies themselves.
"""

__version__ = "0.1.0"
