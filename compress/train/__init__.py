"""Fine-tuning: settings, the seeded loop, distillation, evaluation, metrics, validation slices."""
