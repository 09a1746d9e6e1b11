"""The last stage, in four parts that each read alone: ``stage.Forward`` says their order; ``attempt`` is one call
to one deployment, ``order`` the order of attempts (deployments, fleet nodes, fallbacks), ``cascade`` the small
model judged before the large one, ``relay`` the answer on its way to the client."""
