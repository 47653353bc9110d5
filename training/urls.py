from django.urls import path

from training import views

urlpatterns = [
    path("projects/<slug:slug>/rounds/", views.round_list, name="rounds"),
    path("projects/<slug:slug>/rounds/start/", views.round_start, name="round-start"),
    path("projects/<slug:slug>/rounds/<int:number>/", views.round_detail, name="round"),
    path("projects/<slug:slug>/rounds/<int:number>/abandon/", views.round_abandon, name="round-abandon"),
]
