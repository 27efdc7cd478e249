"""Knowledge distillation: losses, teacher/student layer maps, and teacher-generated responses."""
