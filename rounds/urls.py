from django.urls import path

from rounds import views

urlpatterns = [
    path("projects/<slug:slug>/rounds/", views.round_list, name="rounds"),
    path("projects/<slug:slug>/rounds/start/", views.round_start, name="round-start"),
    path("projects/<slug:slug>/rounds/<int:number>/", views.round_detail, name="round"),
    path("projects/<slug:slug>/rounds/<int:number>/abandon/", views.round_abandon, name="round-abandon"),
    path("projects/<slug:slug>/reward-models/", views.reward_model_list, name="reward-models"),
    path("projects/<slug:slug>/reward-models/train/", views.reward_model_train, name="reward-model-train"),
]
