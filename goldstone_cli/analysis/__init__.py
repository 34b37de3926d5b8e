"""From trained embeddings to findings: semantic-change analysis of dynamic word embeddings.

One module per idea:

- :mod:`.embeddings` - time-sliced embeddings of a run folder (means, posterior, word presence) or of
  an exported folder, and step look-up by year or label;
- :mod:`.changes` - words ranked by how much they moved between two steps (cosine distance of the
  means; for variational runs the posterior mean and credible interval of that distance);
- :mod:`.neighbors` - nearest neighbours of a word at several steps;
- :mod:`.plots` - a word's path among its neighbours, and its distance to the first step over time;
- :mod:`.export` - word2vec / npy files per step;
- :mod:`.align` - chain Procrustes over O(d) for embeddings trained elsewhere;
- :mod:`.lsc` - SemEval-2020 Task 1 scoring (accuracy, Spearman's rho);
- :mod:`.planted` - a generated corpus with planted changes, and how well a run recovers them.
"""
