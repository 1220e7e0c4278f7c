"""Stream definitions: each module registers its streams with @register_stream."""
