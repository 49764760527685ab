"""Ray Tune + Optuna: the search space, OptunaSearch set-up, the MO-ASHA scheduler, the Pareto front,
hypervolume and knee, and resuming a study. Pareto math and MO-ASHA decisions are pure functions of
plain data (``pareto``, ``moasha.MoAshaRungs``). Must not import dynmm.cluster."""
