from django.contrib import admin

from annotation.models import Assignment, Comparison, Project, Vote


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "overlap", "lease_seconds", "members_only", "created_at"]
    list_filter = ["members_only"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["members"]


@admin.register(Comparison)
class ComparisonAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "origin", "vote_count", "created_at"]
    list_filter = ["project", "origin"]
    raw_id_fields = ["prompt", "response_a", "response_b"]


@admin.register(Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ["id", "comparison", "labeler", "status", "expires_at"]
    list_filter = ["status"]
    raw_id_fields = ["comparison"]


@admin.register(Vote)
class VoteAdmin(admin.ModelAdmin):
    list_display = ["id", "comparison", "labeler", "choice", "strength", "created_at"]
    list_filter = ["choice"]
    raw_id_fields = ["comparison", "assignment", "winner", "shown_left"]
