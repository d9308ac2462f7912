FROM scratch
ADD {{GIT}}/repo.git#{{COMMIT1}} /r
