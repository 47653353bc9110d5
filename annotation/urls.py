from django.urls import path

from annotation import api, dashboard, views

urlpatterns = [
    path("", views.home, name="home"),
    path("p/<slug:slug>/label/", views.label, name="label"),
    path("assignments/<int:assignment_id>/vote/", views.vote, name="vote"),
    path("assignments/<int:assignment_id>/skip/", views.skip, name="skip"),
    path("projects/<slug:slug>/dashboard/", dashboard.dashboard, name="dashboard"),
    path("projects/<slug:slug>/review/", dashboard.review, name="review"),
    path("projects/<slug:slug>/import/", dashboard.import_upload, name="import-upload"),
    path("projects/<slug:slug>/agreement/refresh/", dashboard.refresh, name="agreement-refresh"),
    path("projects/<slug:slug>/access/", dashboard.access, name="project-access"),
    path("projects/<slug:slug>/ai-labelers/", dashboard.ai_labeler_add, name="ai-labeler-add"),
    path("comparisons/<int:comparison_id>/adjudicate/", dashboard.adjudicate, name="adjudicate"),
    path("api/v1/projects/<slug:slug>/assignments/", api.ClaimAPI.as_view(), name="api-claim"),
    path("api/v1/assignments/<int:assignment_id>/vote/", api.VoteAPI.as_view(), name="api-vote"),
    path("api/v1/projects/<slug:slug>/agreement/", api.AgreementAPI.as_view(), name="api-agreement"),
    path("api/v1/projects/<slug:slug>/export/", api.ExportAPI.as_view(), name="api-export"),
    path("api/v1/projects/<slug:slug>/import/", api.ImportAPI.as_view(), name="api-import"),
    path("api/v1/projects/<slug:slug>/votes/", api.VotesAPI.as_view(), name="api-votes"),
]
