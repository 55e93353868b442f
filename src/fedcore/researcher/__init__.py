"""The researcher's side: experiments, the federation session, rounds, statistics."""
