"""Models: spec strings to a loaded `Model` (`loader`), architecture adapters (`adapters`),
the functional components the engine runs (`components`), tracr programs (`tracr`)."""
