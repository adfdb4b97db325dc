"""safesearch: graft safety back into fine-tuned (medical) LLMs in parameter space.

A safety vector (aligned minus unaligned checkpoint) and a medical vector (medical minus its parent)
are added to an anchor with one coefficient per module group; a multi-objective Optuna study searches
those coefficients for the Pareto front of safety against medical accuracy.
"""

__version__ = "0.1.0"
