"""Recipes: linear scripts ``main(config) -> Result`` that set up, train and save."""
