"""Where drafts come from: the Draft record, the suffix index over requests and past outputs, the
external corpus, and the OWL LSTM drafter's runtime."""
