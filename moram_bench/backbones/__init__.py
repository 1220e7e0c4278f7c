"""Backbone loaders: each module registers its backbones with @register_backbone."""
