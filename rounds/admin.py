from django.contrib import admin

from rounds.models import TrainingSettings


@admin.register(TrainingSettings)
class TrainingSettingsAdmin(admin.ModelAdmin):
    list_display = [
        "project",
        "algorithm",
        "min_new_comparisons",
        "policy",
        "held_out_prompts",
        "hacking_length_factor",
    ]
