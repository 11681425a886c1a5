"""Foundation models: backbones, universal heads, checkpoint zoo and safe loading."""
